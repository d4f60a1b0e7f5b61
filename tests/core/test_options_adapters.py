"""The adapters build on the core's options model: same name, same meaning, same default, same
checks, and errors that name the option as the adapter's users spell it."""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

import lightning as L
from ckpt_plugins import CheckpointManager, ConfigError
from ckpt_plugins.hf import CheckpointArguments
from ckpt_plugins.hf import CheckpointCallback as HfCallback
from ckpt_plugins.hf.options import CallbackOptions
from ckpt_plugins.lightning import CheckpointCallback, CheckpointIOPlugin
from ckpt_plugins.options import ManagerOptions

TESTS = Path(__file__).resolve().parents[1]
DOCS = TESTS.parent / "docs" / "options.md"
sys.path.insert(0, str(TESTS / "helpers"))
import hf_train  # noqa: E402

one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)


def parse(*argv: str) -> tuple[TrainingArguments, CheckpointArguments]:
    return HfArgumentParser((TrainingArguments, CheckpointArguments)).parse_args_into_dataclasses(
        ["--output_dir", "out", "--use_cpu", "--report_to", "none", *argv]
    )


# --- the same checks as the core, at construction --------------------------------------------
@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(async_save="yes"), "async_save"),
        (dict(verify="no"), "verify"),
        (dict(overwrite="no"), "overwrite"),
        (dict(max_pending=0), "max_pending"),
        (dict(snapshot="fast"), "snapshot"),
        (dict(keep_time_interval="1h"), "keep_time_interval"),
    ],
)
def test_lightning_callback_checks_every_manager_option_at_construction(kwargs, option):
    with pytest.raises(ConfigError) as info:
        CheckpointCallback("ckpts", **kwargs)
    assert info.value.option == option and repr(next(iter(kwargs.values()))) in str(info.value)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(async_save="yes"), "async_save"),
        (dict(verify="no"), "verify"),
        (dict(max_pending=0), "max_pending"),
        (dict(on_error="ignore"), "on_error"),
        (dict(writer="process", async_save=False), "writer"),
    ],
)
def test_lightning_plugin_checks_its_options_with_the_core(kwargs, option):
    with pytest.raises(ConfigError) as info:
        CheckpointIOPlugin(**kwargs)
    assert info.value.option == option


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--ckpt_max_pending", "0"], "--ckpt_max_pending"),
        (["--ckpt_keep_last", "0"], "--ckpt_keep_last"),
        (["--ckpt_keep_time_interval", "-5"], "--ckpt_keep_time_interval"),
        (["--ckpt_snapshot", "overlap", "--ckpt_async_save", "false"], "--ckpt_snapshot"),
    ],
)
def test_hf_flags_fail_at_parse_time_naming_the_flag(argv, flag):
    with pytest.raises(ConfigError) as info:
        parse(*argv)
    assert info.value.option == flag and str(info.value).startswith(flag), str(info.value)


def test_hf_keep_best_without_a_monitor_names_the_flags(tmp_path):
    _, ckpt = parse("--ckpt_keep_best", "1")
    with pytest.raises(ConfigError) as info:
        hf_train.make_trainer(tmp_path, 2, extra_callbacks=[HfCallback.from_args(ckpt)])
    message = str(info.value)
    assert "--ckpt_keep_best" in message and "--ckpt_monitor" in message, message
    assert "monitor=" not in message.replace("--ckpt_monitor", ""), message


def test_hf_mode_against_greater_is_better_is_refused_without_keep_best(tmp_path):
    _, ckpt = parse("--ckpt_mode", "max")
    args = hf_train.training_args(tmp_path, 2, greater_is_better=False)
    with pytest.raises(ConfigError, match="--ckpt_mode='max' contradicts greater_is_better=False"):
        HfCallback.from_args(ckpt).on_init_end(args, None, None)


# --- the same defaults, or a documented reason ------------------------------------------------
def _core_defaults() -> dict[str, object]:
    return ManagerOptions().flat()


def _adapter_defaults() -> dict[str, dict[str, object]]:
    def signature(fn) -> dict[str, object]:
        return {
            n: p.default
            for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty
        }

    hf = {f.name: f.default for f in fields(CallbackOptions) if f.default is not MISSING}
    flags = {f.name.removeprefix("ckpt_"): f.default for f in fields(CheckpointArguments) if f.default is not MISSING}
    return {
        "lightning.CheckpointCallback": signature(CheckpointCallback.__init__),
        "lightning.CheckpointIOPlugin": signature(CheckpointIOPlugin.__init__),
        "hf.CheckpointCallback": hf,
        "hf.CheckpointArguments": flags,
    }


def _documented_differences() -> set[tuple[str, str]]:
    """(option, adapter) pairs of the table under 'Deliberate differences' in docs/options.md."""
    text = DOCS.read_text()
    section = text.split("## Deliberate differences", 1)[1].split("\n## ", 1)[0]
    pairs = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[0].startswith("`"):
            for adapter in re.findall(r"`([\w.]+)`", cells[1]):
                pairs.add((cells[0].strip("`"), adapter))
    return pairs


def test_a_shared_option_has_the_core_default_unless_documented():
    core = _core_defaults()
    differing = {
        (name, adapter)
        for adapter, defaults in _adapter_defaults().items()
        for name, default in defaults.items()
        if name in core and default != core[name]
    }
    assert differing == _documented_differences()


def test_the_core_options_page_lists_every_option():
    text = DOCS.read_text()
    missing = [name for name in _core_defaults() if f"`{name}`" not in text]
    assert not missing


# --- every manager an adapter opens is closed --------------------------------------------------
class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 4))
        return torch.utils.data.DataLoader(data, batch_size=2)


def _fit(tmp_path, max_steps, **fit_kwargs):
    callback = CheckpointCallback(tmp_path / "ckpts", every_n_train_steps=2)
    L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(_Net(), **fit_kwargs)
    return callback


def test_lightning_adapter_closes_every_manager_it_opens(tmp_path, monkeypatch):
    """Every manager opened while a Trainer works (the callback's, the plugin's, the reader that
    ``ckpt_path="last"`` uses) is closed when that work ends; path lookups afterwards reuse one
    reader instead of opening a manager each time."""
    opened: list[CheckpointManager] = []
    original_init = CheckpointManager.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(CheckpointManager, "__init__", recording_init)
    _fit(tmp_path, 4)
    assert opened and [m.directory for m in opened if not m._closed] == []
    callback = _fit(tmp_path, 6, ckpt_path="last")
    assert [m.directory for m in opened if not m._closed] == []
    before = len(opened)
    paths = {callback.last_model_path for _ in range(5)}
    assert len(paths) == 1 and paths.pop().endswith("step=6.ckpt")
    assert len(opened) - before <= 1
