"""The CLI on s3:// URLs, the endpoint and credentials from the environment (as a job sets them)."""

from __future__ import annotations

import json

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


def test_cli_takes_storage_options_as_json_on_s3_urls(s3_bucket, s3_server, monkeypatch, capsys, tmp_path):
    """Endpoint and credentials only in ``--storage-options`` (nothing in the environment):
    ls / verify / diff / prune / convert on s3:// URLs; a bad value names the flag and
    never echoes what was passed."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "CKPT_PLUGINS_STORAGE_OPTIONS"):
        monkeypatch.delenv(key, raising=False)
    secret = "cli-secret-5be3a9"
    options = {**s3_server.storage_options(), "key": "testing-key", "secret": secret}
    flag = ["--storage-options", json.dumps(options)]
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, storage_options=options) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((8,), float(step))})
    assert cli_main(["ls", url, *flag]) == 0
    assert cli_main([*flag, "verify", url]) == 0  # before the command too
    assert cli_main(["diff", f"{url}/step_1", f"{url}/step_3", *flag]) == 1
    out = tmp_path / "w.safetensors"
    assert cli_main(["convert", url, str(out), "--to", "safetensors", *flag]) == 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["w"], torch.full((8,), 3.0))
    assert cli_main(["prune", url, "--keep-last", "1", "--yes", *flag]) == 0
    monkeypatch.setenv("CKPT_PLUGINS_STORAGE_OPTIONS", json.dumps(options))  # the same from the environment
    assert cli_main(["ls", url, "--json"]) == 0
    listed = capsys.readouterr()
    assert "step_3" in listed.out and "step_1" not in listed.out.split("step_3")[-1]
    assert secret not in listed.out + listed.err
    assert cli_main(["ls", url, "--storage-options", '{"secret": "' + secret + '"']) == 2
    err = capsys.readouterr().err
    assert "--storage-options must be a JSON object" in err and secret not in err
