"""A real ``transformers.Trainer`` with our callback on an s3:// directory (the moto server):
checkpoints go to the store, endpoint and credentials only in ``storage_options`` (none in the
environment, none in any object or log line), and ``--resume_from_checkpoint True`` resumes from
the store: the checkpoint is downloaded (checksums verified) and the run ends where an
uninterrupted one does."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from ckpt_plugins import CheckpointManager
from ckpt_plugins.hf import CheckpointArguments, CheckpointCallback
from soak import MIRROR_DDP_X2, soak_only

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
import hf_train

one_thread = pytest.fixture(autouse=True)(hf_train.single_thread)


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_hf_trainer_saves_to_and_resumes_from_s3(s3_bucket, s3_server, tmp_path, monkeypatch, caplog):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    secret = "hf-secret-0c7d3f"
    options = {**s3_server.storage_options(), "key": "testing-key", "secret": secret}
    url = f"s3://{s3_bucket}/hf"
    caplog.set_level(logging.DEBUG, logger="ckpt_plugins")

    reference = hf_train.make_trainer(tmp_path / "ref", 8, model_kind="plain")
    reference.train()
    expected = hf_train.trainable_state(reference)

    first = hf_train.make_trainer(  # the same run, stopped after step 4 (as a preemption would)
        tmp_path / "out",
        8,
        model_kind="plain",
        extra_callbacks=[CheckpointCallback(url, keep_last=2, storage_options=options), _StopAt(4)],
    )
    first.train()
    with CheckpointManager(url, read_only=True, storage_options=options, dir_prefix="checkpoint-") as reader:
        assert reader.steps() == [4]

    argv = ["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "True", "--use_cpu"]
    argv += ["--ckpt_dirpath", url, "--ckpt_storage_options", json.dumps(options), "--report_to", "none"]
    parsed, ckpt = HfArgumentParser((TrainingArguments, CheckpointArguments)).parse_args_into_dataclasses(argv)
    assert secret not in repr(ckpt)
    resumed = hf_train.make_trainer(
        tmp_path / "out",
        8,
        model_kind="plain",
        extra_callbacks=[CheckpointCallback.from_args(ckpt)],
        resume_from_checkpoint=parsed.resume_from_checkpoint,
    )
    local = tmp_path / "out" / ".ckpt-plugins-resume" / "checkpoint-4"  # the callback resolved "True" to it
    assert resumed.args.resume_from_checkpoint == str(local) and (local / "trainer_state.json").exists()
    resumed.train(resume_from_checkpoint=resumed.args.resume_from_checkpoint)
    assert resumed.state.global_step == 8
    for key, value in expected.items():
        assert torch.allclose(hf_train.trainable_state(resumed)[key], value, atol=1e-6), key
    with CheckpointManager(url, read_only=True, storage_options=options, dir_prefix="checkpoint-") as reader:
        assert reader.steps() == [4, 8]
    client = s3_server.client()
    for obj in client.list_objects_v2(Bucket=s3_bucket).get("Contents", []):
        assert secret.encode() not in client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read(), obj["Key"]
    assert secret not in caplog.text


def test_hf_trainer_with_a_local_mirror_of_s3_resumes_from_the_local_copy(s3_bucket, s3_server, tmp_path):
    """``--ckpt_dirpath s3://... --ckpt_mirror LOCAL``: saves commit locally and are uploaded in the
    background; ``--resume_from_checkpoint True`` resolves to the local copy (no download) and the
    resumed run ends where an uninterrupted one does."""
    url, local = f"s3://{s3_bucket}/hf", tmp_path / "local"
    flags = ["--ckpt_dirpath", url, "--ckpt_storage_options", json.dumps(s3_server.storage_options())]
    flags += ["--ckpt_mirror", str(local), "--ckpt_keep_local", "1", "--ckpt_keep_last", "2"]

    def parse(*more: str):
        argv = ["--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none", *more, *flags]
        return HfArgumentParser((TrainingArguments, CheckpointArguments)).parse_args_into_dataclasses(argv)

    reference = hf_train.make_trainer(tmp_path / "ref", 8, model_kind="plain")
    reference.train()
    expected = hf_train.trainable_state(reference)

    _, ckpt = parse()
    assert ckpt.to_options().mirror == str(local)
    first = hf_train.make_trainer(
        tmp_path / "out", 8, model_kind="plain", extra_callbacks=[CheckpointCallback.from_args(ckpt), _StopAt(4)]
    )
    first.train()
    assert (local / "checkpoint-4" / "manifest.json").exists()
    with CheckpointManager(
        url, read_only=True, storage_options=s3_server.storage_options(), dir_prefix="checkpoint-"
    ) as r:
        assert r.steps() == [4]  # uploaded by the end of train()

    parsed, ckpt = parse("--resume_from_checkpoint", "True")
    resumed = hf_train.make_trainer(
        tmp_path / "out",
        8,
        model_kind="plain",
        extra_callbacks=[CheckpointCallback.from_args(ckpt)],
        resume_from_checkpoint=parsed.resume_from_checkpoint,
    )
    assert resumed.args.resume_from_checkpoint == str(local / "checkpoint-4")  # the local copy, not a download
    assert not (tmp_path / "out" / ".ckpt-plugins-resume").exists()
    resumed.train(resume_from_checkpoint=resumed.args.resume_from_checkpoint)
    assert resumed.state.global_step == 8
    for key, value in expected.items():
        assert torch.allclose(hf_train.trainable_state(resumed)[key], value, atol=1e-6), key
    with CheckpointManager(
        url, read_only=True, storage_options=s3_server.storage_options(), dir_prefix="checkpoint-"
    ) as r:
        assert r.steps() == [4, 8]
    assert sorted(n for n in local.iterdir() if not n.name.startswith(".")) == [local / "checkpoint-8"]


@soak_only(MIRROR_DDP_X2)
@pytest.mark.timeout(200)
def test_torchrun_two_ranks_through_a_mirror_of_s3(s3_bucket, s3_server, tmp_path):
    """DDP x2 (torchrun, gloo) with ``mirror=``: every checkpoint the ranks save lands in the store
    with both ranks' RNG files under one manifest; the local copies are trimmed to ``keep_local``."""
    import subprocess

    url, local = f"s3://{s3_bucket}/hf-ddp", tmp_path / "local"
    script = Path(__file__).resolve().parents[1] / "helpers" / "hf_train.py"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    argv = [*launch, str(tmp_path / "out"), "--steps", "8", "--ckpt-dir", url, "--mirror", str(local)]
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint, "OMP_NUM_THREADS": "1", "CKPT_HF_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-5000:]
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="hf-ddp/").get("Contents", [])]
    names = {k.split("/")[1] for k in keys if k.endswith("/manifest.json")}
    assert names == {"checkpoint-4", "checkpoint-8"}, keys
    files = {k.split("/", 2)[2] for k in keys if k.split("/")[1] == "checkpoint-8"}
    assert {"manifest.json", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= files, files
    assert sorted(n for n in os.listdir(local) if not n.startswith(".")) == ["checkpoint-8"]
    options = s3_server.storage_options()
    with CheckpointManager(url, read_only=True, storage_options=options, dir_prefix="checkpoint-") as reader:
        assert reader.verify(8) == []
