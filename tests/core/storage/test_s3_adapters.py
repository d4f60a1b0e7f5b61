"""The adapters on s3:// directories: a real Lightning Trainer saving to, and resuming from, the
moto server (``ckpt_path="last"``, the endpoint from the environment as Lightning's own checks
need; and ``storage_options`` alone through the callback and the plugin)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch.utils.data import DataLoader

import lightning as L
from ckpt_plugins import CheckpointManager
from ckpt_plugins.lightning import CheckpointCallback, CheckpointIOPlugin
from ckpt_plugins.lightning.convert import CALLBACK_NAMES
from lightning_train import Net, data
from soak import MIRROR_DDP_X2, soak_only


def _fit(callback, steps: int, ckpt_path=None, plugins=None):
    L.seed_everything(0)
    model = Net()
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=True,
        plugins=plugins,
    )
    trainer.fit(model, DataLoader(data(96), batch_size=8, shuffle=True), ckpt_path=ckpt_path)
    return trainer, model


def test_lightning_callback_saves_to_and_resumes_from_s3(s3_bucket, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    url = f"s3://{s3_bucket}/lightning"
    _, model = _fit(CheckpointCallback(url, every_n_train_steps=4, keep_last=2), steps=12)
    with CheckpointManager(url, read_only=True, name_template=CALLBACK_NAMES) as reader:
        assert reader.steps() == [8, 12]
        saved = reader.restore("latest")
        step_12 = f"{url}/{reader.path_for(12).rsplit('/', 1)[-1]}"
    for key, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value), key
    # ckpt_path="last": the callback offers the newest checkpoint's manifest object (Lightning picks
    # candidates by fs.modified(), which a prefix lacks); loading that path loads the folder
    trainer, _ = _fit(CheckpointCallback(url, every_n_train_steps=4, keep_last=2), steps=16, ckpt_path="last")
    assert trainer.ckpt_path == f"{step_12}/manifest.json"
    assert trainer.global_step == 16
    with CheckpointManager(url, read_only=True, name_template=CALLBACK_NAMES) as reader:
        assert reader.steps() == [12, 16]


def test_lightning_callback_and_plugin_take_storage_options_and_never_write_them(
    s3_bucket, s3_server, monkeypatch, caplog
):
    """Endpoint and credentials only in ``storage_options`` (none in the environment): the
    callback saves to s3 and resumes from an explicit URL through the plugin, which takes them
    too; the secret is in no object and no log line."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    secret = "lightning-secret-91d2e7"
    options = {**s3_server.storage_options(), "key": "testing-key", "secret": secret}
    url = f"s3://{s3_bucket}/lightning"
    caplog.set_level(logging.DEBUG, logger="ckpt_plugins")
    _, model = _fit(CheckpointCallback(url, every_n_train_steps=4, keep_last=1, storage_options=options), steps=8)
    with CheckpointManager(url, read_only=True, storage_options=options, name_template=CALLBACK_NAMES) as reader:
        assert reader.steps() == [8]
        saved = reader.restore("latest")
        step_8 = f"{url}/{reader.path_for(8).rsplit('/', 1)[-1]}"
    for key, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value), key
    callback = CheckpointCallback(url, every_n_train_steps=4, keep_last=1, storage_options=options)
    trainer, _ = _fit(callback, steps=12, ckpt_path=step_8, plugins=[CheckpointIOPlugin(storage_options=options)])
    assert trainer.global_step == 12
    trainer.save_checkpoint(f"{url}/manual.ckpt", storage_options=options)
    trainer.strategy.checkpoint_io.teardown()
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert any(k.startswith("lightning/") and k.endswith("step=12.ckpt/manifest.json") for k in keys), keys
    assert "lightning/manual.ckpt" in keys, keys
    for key in keys:
        assert secret.encode() not in client.get_object(Bucket=s3_bucket, Key=key)["Body"].read(), key
    assert secret not in caplog.text
    assert secret not in repr(callback) and secret not in repr(trainer.strategy.checkpoint_io)


def test_lightning_callback_with_a_local_mirror_of_s3(s3_bucket, s3_server, monkeypatch, tmp_path):
    """``CheckpointCallback(dirpath="s3://...", mirror=local)``: every save (ModelCheckpoint's names
    and ``last.ckpt``) commits locally and reaches the store in the background; ``ckpt_path="last"``
    resumes from the local copy, and on another host (an empty mirror) from the store."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    url, local = f"s3://{s3_bucket}/lightning", tmp_path / "local"
    options = dict(every_n_train_steps=4, keep_last=2, save_last=True, mirror=local, keep_local=1)
    _, model = _fit(CheckpointCallback(url, **options), steps=12)
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="lightning/").get("Contents", [])]
    remote = {k.split("/")[1] for k in keys if k.endswith("/manifest.json")}
    assert remote == {"epoch=0-step=8.ckpt", "epoch=0-step=12.ckpt", "last.ckpt"}, remote  # keep_last=2, and last
    assert {n for n in os.listdir(local) if not n.startswith(".")} == {"epoch=0-step=12.ckpt", "last.ckpt"}
    with CheckpointManager(url, read_only=True, name_template=CALLBACK_NAMES) as reader:
        saved = reader.restore(12)
    for key, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value), key
    trainer, _ = _fit(CheckpointCallback(url, **options), steps=16, ckpt_path="last")
    assert trainer.ckpt_path == str(local / "epoch=0-step=12.ckpt")  # the local copy
    assert trainer.global_step == 16
    other = options | {"mirror": tmp_path / "other"}  # another host: nothing local yet
    trainer, _ = _fit(CheckpointCallback(url, **other), steps=20, ckpt_path="last")
    assert trainer.ckpt_path.startswith(url) and "step=16.ckpt" in trainer.ckpt_path
    assert trainer.global_step == 20


@soak_only(MIRROR_DDP_X2)
@pytest.mark.timeout(200)
def test_lightning_ddp_x2_through_a_mirror_of_s3(s3_bucket, s3_server, tmp_path):
    """DDP x2 (gloo, Lightning's subprocess launcher) with ``mirror=``: each rank's file of every
    kept checkpoint reaches the store, each under a manifest, and the local copies are trimmed."""
    import subprocess
    import sys

    from conftest import HELPERS

    url, local = f"s3://{s3_bucket}/ddp", tmp_path / "local"
    argv = [sys.executable, str(HELPERS / "lightning_train.py"), "--dir", url, "--mirror", str(local)]
    argv += ["--steps", "12", "--every", "4", "--keep-last", "2", "--ddp"]
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="ddp/").get("Contents", [])]
    names = {k.split("/")[1] for k in keys if k.endswith("/manifest.json")}
    assert names == {"epoch=1-step=8.ckpt", "epoch=1-step=12.ckpt"}, keys  # 6 batches per rank and epoch
    for name in names:
        files = {k.split("/", 2)[2] for k in keys if k.split("/")[1] == name}
        assert {"manifest.json", "rank_0.safetensors", "rank_1.safetensors", "state.safetensors"} <= files, files
    assert {n for n in os.listdir(local) if not n.startswith(".")} == {"epoch=1-step=12.ckpt"}
    options = s3_server.storage_options()
    with CheckpointManager(url, read_only=True, storage_options=options, name_template=CALLBACK_NAMES) as reader:
        assert reader.steps() == [8, 12] and reader.verify(12) == []


def test_lightning_plugin_with_a_local_mirror_of_s3(s3_bucket, s3_server, monkeypatch, tmp_path):
    """``CheckpointIOPlugin(mirror=local)`` under ``ModelCheckpoint(dirpath="s3://...")``: each
    ``.ckpt`` commits locally and is uploaded in the background, ``save_top_k`` removes both
    copies, a resume reads the local copy; a file a crash left local (never uploaded) is uploaded
    at the next plugin's first save."""
    import shutil

    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # ModelCheckpoint's own fsspec checks
    url, local = f"s3://{s3_bucket}/plugin", tmp_path / "local"

    def remote() -> set[str]:
        listed = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="plugin/").get("Contents", [])
        return {o["Key"].split("/", 1)[1] for o in listed}

    def fit(steps: int, ckpt_path=None):
        callback = ModelCheckpoint(dirpath=url, every_n_train_steps=4, save_top_k=1)
        return _fit(callback, steps, ckpt_path=ckpt_path, plugins=[CheckpointIOPlugin(mirror=local, keep_local=1)])

    fit(8)
    assert remote() == {"epoch=0-step=8.ckpt"}  # step 4 removed from both sides (save_top_k=1)
    assert {n for n in os.listdir(local) if not n.startswith(".")} == {"epoch=0-step=8.ckpt"}
    s3_server.client().put_object(Bucket=s3_bucket, Key="plugin/epoch=0-step=8.ckpt", Body=b"not a checkpoint")
    trainer, _ = fit(12, ckpt_path=f"{url}/epoch=0-step=8.ckpt")  # read from the local copy (the store's is junk)
    assert trainer.global_step == 12 and remote() == {"epoch=0-step=12.ckpt"}
    shutil.copy(local / "epoch=0-step=12.ckpt", local / "orphan.ckpt")  # committed locally, then a crash
    plugin = CheckpointIOPlugin(mirror=local)
    trainer.strategy.checkpoint_io = plugin
    trainer.save_checkpoint(f"{url}/manual.ckpt")
    plugin.teardown()
    assert remote() == {"epoch=0-step=12.ckpt", "orphan.ckpt", "manual.ckpt"}
    loaded = plugin.load_checkpoint(f"{url}/orphan.ckpt")
    for key, value in loaded["state_dict"].items():
        assert torch.equal(value, trainer.lightning_module.state_dict()[key]), key
