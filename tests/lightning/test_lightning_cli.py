"""The LightningCLI example (a few steps), YAML configuration of the callback and the plugin, and
the ways out to plain Lightning: ``load_from_checkpoint`` and ``convert --to lightning``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from ckpt_plugins.activation import activation_checkpointing_report
from ckpt_plugins.lightning import CheckpointCallback, CheckpointIOPlugin, load_from_checkpoint, to_lightning_checkpoint
from conftest import ROOT
from lightning_names import path_of, steps_in

EXAMPLE = ROOT / "examples" / "lightning"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"ckpt_plugins_lightning_example_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _load("train")
    torch.set_num_threads(threads)


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(EXAMPLE / "config.yaml"),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        *extra,
    ]


def test_the_example_trains_checkpoints_and_resumes_from_yaml(example, tmp_path):
    cli = example.main(_args(tmp_path))
    callback = cli.trainer.checkpoint_callback
    assert isinstance(callback, CheckpointCallback)
    assert callback.gradient_checkpointing.mode == "selective"  # gradient_checkpointing: {mode: selective}
    report = activation_checkpointing_report(cli.model)
    assert report.mode == "selective" and [w.class_name for w in report.wrapped] == ["GPT2Block", "GPT2Block"]
    assert not isinstance(cli.trainer.strategy.checkpoint_io, CheckpointIOPlugin)  # the callback keeps the IO
    ckpt_dir = tmp_path / "logs" / "main" / "checkpoints"
    assert steps_in(ckpt_dir) == [5]

    cli = example.main(_args(tmp_path, "--ckpt_path", "last", "--trainer.max_steps=10"))
    assert cli.trainer.ckpt_path == str(path_of(ckpt_dir, 5)) and cli.trainer.global_step == 10
    assert steps_in(ckpt_dir) == [5, 10]

    tiny_gpt = _load("tiny_gpt")
    converted = tmp_path / "model.ckpt"
    to_lightning_checkpoint(ckpt_dir, converted)  # the run directory: its latest checkpoint
    assert torch.load(converted, weights_only=True)["global_step"] == 10
    expected = cli.model.state_dict()
    for loaded in (
        tiny_gpt.TinyGPT.load_from_checkpoint(converted),
        tiny_gpt.TinyGPT.load_from_checkpoint(path_of(ckpt_dir, 10)),
        load_from_checkpoint(tiny_gpt.TinyGPT, path_of(ckpt_dir, 10)),
    ):
        assert loaded.hparams.n_embd == 64
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_the_plugin_and_the_callback_are_configurable_from_yaml(example, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  plugins:\n"
        "    - class_path: ckpt_plugins.lightning.CheckpointIOPlugin\n"
        "      init_args: {async_save: true, max_pending: 2}\n"
        "  callbacks:\n"
        "    - class_path: ckpt_plugins.lightning.CheckpointCallback\n"
        f"      init_args: {{dirpath: {tmp_path}, keep_last: 3, keep_time_interval: 3600,\n"
        "                  gradient_checkpointing: {mode: every_n, every_n: 2}}\n"
    )
    tiny_gpt = _load("tiny_gpt")
    cli = LightningCLI(tiny_gpt.TinyGPT, tiny_gpt.TextData, args=["--config", str(config)], run=False)
    io = cli.trainer.strategy.checkpoint_io
    assert isinstance(io, CheckpointIOPlugin) and io.max_pending == 2
    callback = cli.trainer.checkpoint_callback
    assert callback.manager_options["keep_last"] == 3 and callback.manager_options["keep_time_interval"] == 3600
    assert callback.gradient_checkpointing.mode == "every_n" and callback.gradient_checkpointing.every_n == 2


def test_convert_command(tmp_path):
    from ckpt_plugins import CheckpointManager

    with CheckpointManager(tmp_path / "run") as mgr:
        for step in (3, 6):
            mgr.save(step, {"state_dict": {"w": torch.full((2,), float(step))}, "global_step": step, "epoch": 0})
    from ckpt_plugins.lightning.convert import to_lightning_checkpoint

    to_lightning_checkpoint(str(tmp_path / "run"), str(tmp_path / "out.ckpt"), step=3)
    assert torch.equal(torch.load(tmp_path / "out.ckpt", weights_only=True)["state_dict"]["w"], torch.full((2,), 3.0))
    from ckpt_plugins.cli import main

    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--to", "onnx"])
