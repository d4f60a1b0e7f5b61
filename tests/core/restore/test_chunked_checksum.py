"""Chunked checksums (issue #18: verification on more than one core), on real files.

* the streaming hasher writers use and the parallel check readers use agree, for every size
  around the chunk boundary and any split of the stream into pieces;
* a verified restore of a file of several chunks hashes them on more than one thread;
* damage in any one chunk fails the restore and ``verify``, naming the file;
* a checkpoint whose manifest holds the plain whole-file digests of earlier releases still
  restores and verifies, and damage in it is still found;
* a manifest with chunked digests is format version 4; one with only older digests keeps its
  version.
"""

from __future__ import annotations

import json
import os
import random
import threading

import pytest
import torch
import xxhash

from ckpt_plugins import CheckpointManager, CorruptCheckpointError
from ckpt_plugins.files import checksum
from ckpt_plugins.files.checksum import CHUNK, FileHasher, digest_buffer, is_chunked
from ckpt_plugins.files.manifest import parse_manifest

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 12345]


@pytest.fixture(scope="module")
def data() -> bytes:
    return random.Random(0).randbytes(3 * CHUNK + 12345)


@pytest.mark.parametrize("size", SIZES)
def test_streamed_and_parallel_digests_agree_at_every_size_around_the_chunk(data: bytes, size: int) -> None:
    rng = random.Random(size)
    hasher = FileHasher(data[:7] if size >= 7 else b"")
    position = 7 if size >= 7 else 0
    while position < size:
        step = rng.choice([1, 4096, 999_999, CHUNK, 3 * CHUNK])
        hasher.update(data[position : min(size, position + step)])
        position += step
    want = digest_buffer(data[:size])
    assert hasher.hexdigest() == want and is_chunked(want)
    if size:  # one byte more or less is another digest
        assert digest_buffer(data[: size - 1]) != want


def test_a_digest_differs_when_two_chunks_swap(data: bytes) -> None:
    swapped = data[CHUNK : 2 * CHUNK] + data[:CHUNK]
    assert digest_buffer(swapped) != digest_buffer(data[: 2 * CHUNK])


def test_a_plain_recorded_digest_is_checked_the_old_way(data: bytes) -> None:
    plain = xxhash.xxh3_64_hexdigest(data)
    assert digest_buffer(data, like=plain) == plain
    assert not is_chunked(plain)


def _save(tmp_path, nbytes: int) -> tuple[CheckpointManager, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    state = {"big": torch.randn(nbytes // 4, generator=gen), "small": torch.arange(10)}
    mgr = CheckpointManager(tmp_path / "run", async_save=False)
    mgr.save(1, state)
    return mgr, state


def _tensor_file(tmp_path) -> str:
    return str(tmp_path / "run" / "step_1" / "state.safetensors")


def test_a_verified_restore_hashes_the_chunks_on_more_than_one_thread(tmp_path, monkeypatch) -> None:
    # One thread per core: two are asked for whatever this machine has, so the split is tested
    # on a one-core runner too.
    monkeypatch.setattr(checksum, "cores", lambda: 2)
    mgr, state = _save(tmp_path, 5 * CHUNK)
    threads: set[int] = set()
    real = xxhash.xxh3_64_intdigest

    def recording(data):  # records which thread hashed each chunk, then hashes it
        threads.add(threading.get_ident())
        return real(data)

    monkeypatch.setattr(checksum.xxhash, "xxh3_64_intdigest", recording)
    got = mgr.restore(1)
    assert torch.equal(got["big"], state["big"])
    assert len(threads) >= 2


@pytest.mark.parametrize("chunk", [0, 2, 5])
def test_damage_in_any_chunk_fails_restore_and_verify(tmp_path, chunk: int) -> None:
    mgr, _ = _save(tmp_path, 5 * CHUNK)
    path = _tensor_file(tmp_path)
    offset = min(chunk * CHUNK + 4097, os.path.getsize(path) - 1)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(CorruptCheckpointError, match="state.safetensors"):
        mgr.restore(1)  # an explicit step raises instead of falling back
    problems = mgr.verify(1)
    assert any("state.safetensors" in p and "checksum mismatch" in p for p in problems), problems


def _rewrite_with_plain_digests(folder) -> None:
    """Turn a checkpoint into what an earlier release wrote: whole-file xxh3 digests, version 2."""
    manifest_path = folder / "manifest.json"
    doc = json.loads(manifest_path.read_bytes())
    for name, record in doc["files"].items():
        record["xxh3_64"] = xxhash.xxh3_64_hexdigest((folder / name).read_bytes())
    doc["format_version"] = 2
    manifest_path.write_text(json.dumps(doc))


def test_a_checkpoint_with_the_plain_digests_of_earlier_releases_restores_and_verifies(tmp_path) -> None:
    mgr, state = _save(tmp_path, 2 * CHUNK)
    assert json.loads((tmp_path / "run" / "step_1" / "manifest.json").read_bytes())["format_version"] == 4
    _rewrite_with_plain_digests(tmp_path / "run" / "step_1")
    raw = (tmp_path / "run" / "step_1" / "manifest.json").read_bytes()
    assert parse_manifest(raw, "m").format_version == 2
    assert mgr.verify(1) == []
    got = mgr.restore(1)
    assert torch.equal(got["big"], state["big"]) and torch.equal(got["small"], state["small"])
    path = _tensor_file(tmp_path)
    with open(path, "r+b") as f:
        f.seek(CHUNK + 100)
        byte = f.read(1)
        f.seek(CHUNK + 100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        mgr.restore(1)  # an explicit step raises instead of falling back
    assert any("checksum mismatch" in p for p in mgr.verify(1))
