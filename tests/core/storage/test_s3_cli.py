"""The CLI on s3:// URLs, the endpoint and credentials from the environment (as a job sets them)."""

from __future__ import annotations

import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.cli import main as cli_main


def test_cli_reads_verifies_and_prunes_s3_checkpoints(s3_bucket, s3_server, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url) as mgr:  # no storage_options: the environment says where
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((8,), float(step))})
    assert cli_main(["ls", url]) == 0
    assert cli_main(["verify", url]) == 0
    assert cli_main(["inspect", f"{url}/step_3"]) == 0
    assert cli_main(["diff", f"{url}/step_1", f"{url}/step_3"]) == 1  # they differ (docs/cli.md)
    out = capsys.readouterr().out
    assert "step_3" in out and f"{url}/step_2" in out
    assert cli_main(["prune", url, "--keep-last", "1", "--yes"]) == 0
    with CheckpointManager(url, read_only=True) as reader:
        assert reader.steps() == [3]
    client = s3_server.client()
    key = "run/step_3/state.safetensors"
    body = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
    assert cli_main(["verify", url]) != 0
    assert "checksum mismatch" in capsys.readouterr().out
