"""The options model: one frozen, validated object per concern; every option checked at construction.

Each bad value must be a ``ConfigError`` raised by the constructor (before the directory lock is
taken), naming the option and showing the value, with the option name in ``exc.option``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

from ckpt_plugins import CheckpointManager, ConfigError
from ckpt_plugins.options import (
    DistributedOptions,
    IOOptions,
    ManagerOptions,
    RestoreOptions,
    RetentionOptions,
    SaveOptions,
    renamed_options,
)
from ckpt_plugins.retention import KeepLast, RetentionPolicy


def _noop(step, path):
    return None


# option, bad value, text the message must hold besides the option name and the value
BAD_FLAT = [
    ("async_save", "yes", "True or False"),
    ("async_save", 1, "True or False"),
    ("overwrite", "no", "True or False"),
    ("read_only", "false", "True or False"),
    ("distributed", None, "True or False"),
    ("direct_io", "0", "True or False"),
    ("verify", "no", "True or False"),
    ("rank_timeout", -5, "positive"),
    ("rank_timeout", 0, "positive"),
    ("rank_timeout", math.inf, "finite"),
    ("rank_timeout", "600", "number of seconds"),
    ("rank_timeout", True, "number of seconds"),
    ("on_commit", [42], "callable"),
    ("on_commit", 42, "callable"),
    ("on_commit", [_noop, "print"], "callable"),
    ("writer_nice", "5", "integer"),
    ("writer_nice", 2.5, "integer"),
    ("writer_nice", -1, "0 to 19"),
    ("writer_nice", 40, "0 to 19"),
    ("max_pending", 0, "positive"),
    ("max_pending", "2", "positive"),
    ("max_pending", True, "positive"),
    ("on_busy", "drop", "'wait', 'skip'"),
    ("snapshot", "fast", "'safe', 'overlap'"),
    ("on_error", "ignore", "'raise', 'warn'"),
    ("writer", "processes", "'thread', 'process'"),
    ("dir_prefix", "", "folder-name prefix"),
    ("dir_prefix", "a/b", "folder-name prefix"),
    ("dir_prefix", ".hidden", "folder-name prefix"),
    ("dir_prefix", 5, "folder-name prefix"),
    ("keep_last", 0, "positive"),
    ("keep_last", "3", "positive"),
    ("keep_best", -1, "positive"),
    ("keep_every_n_steps", 2.0, "positive"),
    ("keep_time_interval", -1, "positive"),
    ("keep_time_interval", "1h", "seconds"),
    ("keep_time_interval", timedelta(0), "positive"),
    ("monitor", "", "metric name"),
    ("monitor", 3, "metric name"),
    ("mode", "lowest", "'min' or 'max'"),
]


@pytest.mark.parametrize(
    "option, value, text", BAD_FLAT, ids=[re.sub(" at 0x[0-9a-f]+", "", f"{o}={v!r}") for o, v, _ in BAD_FLAT]
)
def test_every_bad_flat_option_is_a_config_error_at_construction(tmp_path, option, value, text):
    kwargs = {option: value}
    if option == "mode":
        kwargs["monitor"] = "loss"
    with pytest.raises(ConfigError) as info:
        CheckpointManager(tmp_path, **kwargs)
    message = str(info.value)
    assert info.value.option == option
    assert option in message and repr(value) in message and text in message, message
    assert not (tmp_path / ".lock").exists()  # refused before the lock was taken


@pytest.mark.parametrize("directory", ["", None, 5, b"runs"])
def test_directory_must_be_a_non_empty_path_or_url(directory):
    with pytest.raises(ConfigError, match="directory") as info:
        CheckpointManager(directory)
    assert info.value.option == "directory" and repr(directory) in str(info.value)


def test_writer_nice_string_from_yaml_is_refused_before_a_writer_starts(tmp_path):
    """``writer_nice="5"`` (as YAML hands it over) used to kill the writer thread, after which
    ``wait()``, ``close()`` and interpreter exit hung. Run in a child with a timeout."""
    script = (
        "import sys, torch\n"
        "from ckpt_plugins import CheckpointManager, ConfigError\n"
        "try:\n"
        "    mgr = CheckpointManager(sys.argv[1], async_save=True, writer_nice='5')\n"
        "except ConfigError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    mgr.save(1, {'w': torch.ones(2)}).wait()\n"
        "    mgr.close()\n"
        "    print('saved')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused:") and "writer_nice" in proc.stdout and "'5'" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(writer="process"), "writer='process' needs async_save=True"),
        (dict(snapshot="overlap"), "snapshot='overlap' needs async_save=True"),
        (dict(keep_best=2), "keep_best=2 needs monitor"),
    ],
)
def test_combinations_are_checked_in_the_group(kwargs, match):
    group = RetentionOptions if "keep_best" in kwargs else SaveOptions
    with pytest.raises(ConfigError, match=match):
        group(**kwargs)


def test_groups_are_frozen_and_never_rewrite_what_they_were_given():
    interval = timedelta(hours=1)
    callbacks = [_noop]
    retention = RetentionOptions(keep_last=2, keep_time_interval=interval)
    saving = SaveOptions(async_save=True, on_commit=callbacks)
    assert retention.keep_time_interval is interval and saving.on_commit is callbacks
    with pytest.raises(dataclasses.FrozenInstanceError):
        retention.keep_last = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        saving.async_save = False  # type: ignore[misc]


def test_defaults_are_the_documented_flat_defaults(tmp_path):
    defaults = ManagerOptions()
    assert defaults.retention == RetentionOptions(
        keep_last=None,
        keep_best=None,
        monitor=None,
        mode="min",
        keep_every_n_steps=None,
        keep_time_interval=None,
        overwrite=False,
    )
    assert defaults.saving == SaveOptions(
        async_save=False,
        max_pending=1,
        on_busy="wait",
        snapshot="safe",
        on_commit=None,
        on_error="raise",
        writer="thread",
        writer_nice=0,
    )
    assert defaults.io == IOOptions(direct_io=True, dir_prefix="step_", read_only=False)
    assert defaults.distributed == DistributedOptions(distributed=True, rank_timeout=600.0)
    assert defaults.restore == RestoreOptions(verify=True)
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.options == defaults


def test_flat_keywords_and_option_objects_build_the_same_manager(tmp_path):
    flat = dict(
        keep_last=2,
        monitor="loss",
        mode="max",
        async_save=True,
        max_pending=2,
        verify=False,
        rank_timeout=30.0,
        dir_prefix="ckpt-",
    )
    with CheckpointManager(tmp_path / "a", **flat) as a:
        expected = a.options
    options = ManagerOptions(
        retention=RetentionOptions(keep_last=2, monitor="loss", mode="max"),
        saving=SaveOptions(async_save=True, max_pending=2),
        io=IOOptions(dir_prefix="ckpt-"),
        distributed=DistributedOptions(rank_timeout=30.0),
        restore=RestoreOptions(verify=False),
    )
    assert ManagerOptions.from_flat(**flat) == options == expected
    with CheckpointManager(tmp_path / "b", options=options) as b:
        assert b.options == options
        b.save(1, {"x": torch.ones(1)}, metrics={"loss": 1.0}).wait()
        assert b.steps() == [1] and (tmp_path / "b" / "ckpt-1").is_dir()
    with CheckpointManager(
        tmp_path / "c", retention_options=RetentionOptions(keep_last=1), save_options=SaveOptions(async_save=True)
    ) as c:
        for step in (1, 2, 3):
            c.save(step, {"x": torch.full((1,), float(step))})
        c.wait()
        assert c.steps() == [3] and c.options.saving.async_save is True


def test_a_flat_keyword_and_its_group_object_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="keep_last.*retention_options") as info:
        CheckpointManager(tmp_path, keep_last=2, retention_options=RetentionOptions(keep_last=3))
    assert info.value.option == "keep_last"
    with pytest.raises(ConfigError, match="options"):
        CheckpointManager(tmp_path, options=ManagerOptions(), save_options=SaveOptions())


def test_unknown_flat_keyword_is_named_with_the_closest_option():
    with pytest.raises(TypeError, match="keep_lats.*keep_last"):
        ManagerOptions.from_flat(keep_lats=3)


def test_the_constructor_defaults_are_the_options_defaults():
    import inspect

    signature = inspect.signature(CheckpointManager.__init__).parameters
    assert {name: signature[name].default for name in ManagerOptions().flat()} == ManagerOptions().flat()


def test_wrong_group_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="retention_options.*RetentionOptions"):
        CheckpointManager(tmp_path, retention_options=SaveOptions())  # type: ignore[arg-type]


def test_a_ready_policy_replaces_the_retention_flags(tmp_path):
    policy = RetentionPolicy((KeepLast(1),))
    with CheckpointManager(tmp_path, policy=policy, monitor="loss") as mgr:
        assert mgr.policy is policy
        for step in (1, 2, 3):
            mgr.save(step, {"x": torch.ones(1)}, metrics={"loss": float(step)})
        assert mgr.steps() == [3]
        assert mgr.best_step() == 3  # monitor still ranks for best_step / restore("best")
    with pytest.raises(ConfigError, match="policy.*keep_last"):
        CheckpointManager(tmp_path, policy=policy, keep_last=2)
    with pytest.raises(ConfigError, match="policy") as info:
        CheckpointManager(tmp_path, policy=[KeepLast(1)])  # type: ignore[arg-type]
    assert info.value.option == "policy"


def test_config_error_carries_option_and_value_and_can_be_renamed():
    with pytest.raises(ConfigError) as info:
        RetentionOptions(keep_best=1)
    exc = info.value
    assert exc.option == "keep_best" and exc.value == 1
    assert "needs monitor" in str(exc)
    renamed = exc.renamed({"keep_best": "--ckpt_keep_best", "monitor": "--ckpt_monitor"})
    assert isinstance(renamed, ConfigError) and renamed.option == "--ckpt_keep_best" and renamed.value == 1
    assert "--ckpt_keep_best" in str(renamed) and "--ckpt_monitor" in str(renamed)
    assert "monitor=" not in str(renamed).replace("--ckpt_monitor", "")
    with pytest.raises(ConfigError, match="--ckpt_max_pending must be a positive integer, got 0"):
        with renamed_options({"max_pending": "--ckpt_max_pending"}):
            SaveOptions(max_pending=0)


def test_plain_config_errors_still_work():
    exc = ConfigError("something is wrong; do this")
    assert str(exc) == "something is wrong; do this" and exc.option is None
    assert str(exc.renamed({"x": "y"})) == "something is wrong; do this"
