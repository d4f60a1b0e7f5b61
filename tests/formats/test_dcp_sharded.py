"""A DCP folder written by 2 real gloo ranks from an FSDP2 (``fully_shard``) state, read in one
process as full plain tensors, bit-exact against the full state DCP's own helpers gather
(``get_model_state_dict(..., full_state_dict=True)``). The layers have 5 and 3 output rows, so
the two ranks' shards are uneven (3 + 2 and 2 + 1 rows)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_plugins.errors import CorruptCheckpointError
from ckpt_plugins.formats import read_foreign
from ckpt_plugins.formats.dcp_metadata import TensorEntry, read_dcp_metadata
from conftest import HELPERS
from dcp_states import assert_same
from ports import free_port


@pytest.fixture(scope="module")
def fsdp_dcp(tmp_path_factory) -> Path:
    """Two real rank processes (tests/helpers/dcp_fsdp_child.py) write the DCP folder once."""
    directory = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPERS / "dcp_fsdp_child.py"), str(directory)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    return directory


def test_fsdp2_shards_read_back_as_the_full_state_bit_exact(fsdp_dcp):
    meta = read_dcp_metadata(fsdp_dcp / "dcp")
    weight = meta.entries["model.0.weight"]
    assert isinstance(weight, TensorEntry) and weight.shape == (5, 8)
    assert sorted(c.sizes for c in weight.chunks) == [(2, 8), (3, 8)]  # uneven: one chunk per rank
    assert {c.storage.relative_path for c in weight.chunks} == {"__0_0.distcp", "__1_0.distcp"}
    full = torch.load(fsdp_dcp / "full.pt", weights_only=True)
    got = read_foreign(fsdp_dcp / "dcp")
    assert_same(got["model"], full["model"])
    assert_same(got["optim"], full["optim"])
    assert got["step"] == 1


def test_restore_of_the_dcp_folder_into_a_fresh_fsdp2_model_at_2_ranks(fsdp_dcp):
    full = torch.load(fsdp_dcp / "full.pt", weights_only=True)["model"]
    restored = torch.load(fsdp_dcp / "restored_model.pt", weights_only=True)
    assert_same(restored, full)


def test_chunks_that_do_not_tile_a_tensor_are_refused(fsdp_dcp, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fsdp_dcp / "dcp", broken)
    meta = pickle.loads((broken / ".metadata").read_bytes())  # our own folder: trusted
    chunks = meta.state_dict_metadata["model.0.weight"].chunks
    (broken / ".metadata").write_bytes(pickle.dumps(_with_chunks(meta, chunks[:1])))
    with pytest.raises(CorruptCheckpointError, match=r"'model.0.weight' hold \d+ of its 40 elements"):
        read_foreign(broken)
    first, second = sorted(chunks, key=lambda c: -c.sizes[0])  # (3, 8) at row 0, (2, 8) at row 3
    moved = dataclasses.replace(second, offsets=first.offsets)  # 24 + 16 = 40 elements, rows 0-1 twice
    (broken / ".metadata").write_bytes(pickle.dumps(_with_chunks(meta, [first, moved])))
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        read_foreign(broken)


def _with_chunks(meta, chunks):
    meta.state_dict_metadata["model.0.weight"].chunks = list(chunks)
    return meta


def test_the_sharded_folder_converts_to_ours_and_back_to_dcp_bit_exact(fsdp_dcp, tmp_path):
    from ckpt_plugins.cli import main

    full = torch.load(fsdp_dcp / "full.pt", weights_only=True)
    assert main(["convert", str(fsdp_dcp / "dcp"), str(tmp_path / "ours"), "--to", "ours"]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "dcp"), "--to", "dcp"]) == 0
    for path in (tmp_path / "ours", tmp_path / "dcp"):
        got = read_foreign(path) if path.name == "dcp" else _restore(path)
        assert_same(got["model"], full["model"])
        assert_same(got["optim"], full["optim"])


def _restore(path: Path):
    from ckpt_plugins import CheckpointManager

    with CheckpointManager(path.parent) as mgr:
        return mgr.restore(str(path))


def test_a_sharded_checkpoint_of_ours_converts_to_dcp_bit_exact(fsdp_dcp, tmp_path):
    from ckpt_plugins.cli import main

    assert (fsdp_dcp / "ours" / "step_1" / "manifest.json").is_file()
    full = torch.load(fsdp_dcp / "full.pt", weights_only=True)
    assert main(["convert", str(fsdp_dcp / "ours"), str(tmp_path / "dcp"), "--to", "dcp"]) == 0
    got = read_foreign(tmp_path / "dcp")
    assert_same(got["model"], full["model"])
    assert_same(got["optim"], full["optim"])


def test_a_tensor_claiming_more_bytes_than_stored_is_refused_before_allocating(fsdp_dcp, tmp_path):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    broken = tmp_path / "inflated"
    shutil.copytree(fsdp_dcp / "dcp", broken)
    meta = pickle.loads((broken / ".metadata").read_bytes())  # our own folder: trusted
    entry, n = meta.state_dict_metadata["model.0.weight"], 10**6
    entry.size = torch.Size([2 * n, 8])
    entry.chunks = [
        ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([n, 8])),
        ChunkStorageMetadata(torch.Size([n, 0]), torch.Size([n, 8])),
    ]
    info = meta.storage_data[MetadataIndex("model.0.weight", [0, 0])]
    meta.storage_data[MetadataIndex("model.0.weight", [n, 0])] = info
    (broken / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match=r"'model.0.weight' claims 64000000 bytes .* stored in \d+"):
        read_foreign(broken)
