"""The in-memory tier in one process: options, budget errors, damaged snapshots, no leaked memory."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch

from ckpt_plugins import CheckpointManager, ConfigError, MemoryTierOptions, StepExistsError
from ckpt_plugins.cli import main as cli_main
from ckpt_plugins.files.manifest import dump_manifest
from ckpt_plugins.files.tensor_file import PENDING_CHECKSUM, checksum_file
from ckpt_plugins.storage.local import LocalStorage
from conftest import HELPERS


def _state(step: int) -> dict:
    return {"w": torch.full((256, 256), float(step)), "step": step}


def test_every_save_snapshots_and_every_kth_persists(tmp_path, shm_of, capsys):
    shm = shm_of(tmp_path)
    with CheckpointManager(tmp_path, memory_tier=MemoryTierOptions(keep=2), persist_every_n_steps=3) as mgr:
        for step in range(1, 8):
            handle = mgr.save(step, _state(step), rank_state={"r": step})
            assert handle.wait().startswith(shm) == (step % 3 != 0)
        assert mgr.steps() == [3, 6]
        assert mgr._memory.tier.steps() == [6, 7]  # keep=2
        assert mgr.latest_step() == 7
        assert mgr.restore("latest")["step"] == 7 and mgr.restored_step == 7
        assert mgr.restore(6)["step"] == 6 and mgr.last_restore_report.source.startswith(shm)
        assert mgr.restore_rank_state(7) == {"r": 7}
        assert cli_main(["ls", str(tmp_path), "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [c["step"] for c in listed["checkpoints"]] == [3, 6]
        assert [(m["step"], m["kind"]) for m in listed["memory"]] == [(6, "memory rank 0"), (7, "memory rank 0")]
        assert cli_main(["ls", str(tmp_path)]) == 0
        assert "memory rank 0" in capsys.readouterr().out
    # close(): the newer snapshot went to disk, the memory is freed
    assert not os.path.exists(shm)
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [3, 6, 7]
        assert torch.equal(mgr.restore("latest")["w"], _state(7)["w"])


def test_a_damaged_snapshot_is_skipped_with_a_warning(tmp_path, shm_of, caplog):
    shm_of(tmp_path)
    mgr = CheckpointManager(tmp_path, memory_tier=MemoryTierOptions(keep=2), persist_every_n_steps=5)
    for step in range(1, 8):
        mgr.save(step, _state(step))
    tier = mgr._memory.tier
    tier.settle()  # a crash after step 7's checksums were recorded (the window is tested below)
    mgr._memory = None  # leave the memory as a crash would
    mgr.close()
    path = os.path.join(tier.path_for(7), "state.safetensors")
    with open(path, "r+b") as f:  # flip a byte of the data
        f.seek(-10, os.SEEK_END)
        byte = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    caplog.set_level(logging.WARNING, logger="ckpt_plugins")
    with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=5) as mgr:
        assert mgr.latest_step() == 6
        assert mgr.restore("latest")["step"] == 6
    assert "memory snapshot step 7" in caplog.text and "damaged" in caplog.text


def test_a_snapshot_whose_checksums_were_never_recorded_restores_with_size_checks_and_says_so(tmp_path, shm_of, caplog):
    # The checksums are recorded just after the commit (memory.mapped); a process that dies in
    # between leaves a complete snapshot whose manifest says "pending". It is restored (it is newer
    # than anything else), with a WARNING; persisting it at close records its checksum then.
    shm_of(tmp_path)
    mgr = CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=5)
    for step in range(1, 8):
        mgr.save(step, _state(step))
    tier = mgr._memory.tier
    tier.settle()
    mgr._memory = None  # the crash
    mgr.close()
    snapshot = tier.path_for(7)
    manifest = tier.layout.read_manifest(snapshot)
    assert all(rec.checksummed for rec in manifest.files.values())  # recorded, in the normal course
    unrecorded = {name: dataclasses.replace(rec, xxh3_64=PENDING_CHECKSUM) for name, rec in manifest.files.items()}
    with open(os.path.join(snapshot, "manifest.json"), "wb") as f:  # as the manifest was at its commit
        f.write(dump_manifest(dataclasses.replace(manifest, files=unrecorded)))
    caplog.set_level(logging.WARNING, logger="ckpt_plugins")
    with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=5) as mgr:
        assert mgr.latest_step() == 7
        assert torch.equal(mgr.restore("latest")["w"], _state(7)["w"])
    assert "step 7" in caplog.text and "only the sizes can be checked" in caplog.text
    with CheckpointManager(tmp_path) as mgr:  # persisted at close, with the checksum taken on the way
        assert mgr.steps() == [5, 7] and mgr.verify(7) == []
        assert all(rec.checksummed for rec in mgr.layout.read_manifest(mgr.path_for(7)).files.values())


def test_overlap_snapshots_get_their_checksums_after_the_commit_as_in_the_default_mode(tmp_path, shm_of):
    # Overlap mode copies on the writer and hashes after the commit on the helper thread
    # (memory.mapped), so wait_for_snapshot() waits for the copy only; the checksums recorded
    # then match the files, and damage to a later piece is found.
    shm_of(tmp_path)
    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: several pieces of PIECE bytes
    opts = {"memory_tier": True, "persist_every_n_steps": 100, "async_save": True, "snapshot": "overlap"}
    with CheckpointManager(tmp_path, **opts) as mgr:
        tier = mgr._memory.tier
        for step in range(1, 4):
            mgr.save(step, {"w": big + step, "small": torch.ones(3), "step": step})
            mgr.wait_for_snapshot()
            mgr.wait()
            tier.settle()
            snapshot = tier.path_for(step)
            manifest = tier.layout.read_manifest(snapshot)
            assert all(rec.checksummed for rec in manifest.files.values())
            for name, rec in manifest.files.items():
                assert checksum_file(tier.storage, os.path.join(snapshot, name)) == rec
            assert torch.equal(mgr.restore("latest")["w"], big + step)
        with open(os.path.join(snapshot, "state.safetensors"), "r+b") as f:  # a byte in a later piece
            f.seek(-(1 << 20), os.SEEK_END)
            byte = f.read(1)[0]
            f.seek(-(1 << 20), os.SEEK_END)
            f.write(bytes([byte ^ 0xFF]))
        assert any("checksum mismatch" in p for p in tier.layout.verify(snapshot))


def _mapped_snapshot_files(folder: str) -> set[str]:
    """Files under ``folder`` that this process has mapped (from /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if folder in line}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_snapshot_files_stay_mapped_while_kept_and_no_mapping_outlives_its_file(tmp_path, shm_of):
    # Snapshots are written through shared mappings kept from one save to the next (memory.mapped).
    # A mapping keeps its pages alive after its file is removed, so only the files still there
    # (the kept snapshot and the spare) may be mapped, and none once the tier is closed.
    shm = shm_of(tmp_path)
    with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=100) as mgr:
        tier = mgr._memory.tier
        for step in range(1, 6):
            mgr.save(step, {"w": torch.full((128, 128) if step < 5 else (16, 16), float(step))})
            mapped = _mapped_snapshot_files(shm)
            assert mapped and all(os.path.exists(p.removesuffix(" (deleted)")) for p in mapped), mapped
            assert not any(p.endswith("(deleted)") for p in mapped)
            assert len(mapped) <= 2  # the snapshot's state file and the spare's
            assert tier.layout.verify(tier.path_for(step)) == []
    assert _mapped_snapshot_files(shm) == set() and not os.path.exists(shm)


def test_budget_and_option_errors_name_the_option(tmp_path, shm_of):
    shm_of(tmp_path)
    with pytest.raises(ConfigError) as exc:
        CheckpointManager(tmp_path, persist_every_n_steps=5)
    assert exc.value.option == "persist_every_n_steps"
    with pytest.raises(ConfigError) as exc:
        CheckpointManager(tmp_path, memory_tier="yes")
    assert exc.value.option == "memory_tier"
    with pytest.raises(ConfigError) as exc:
        MemoryTierOptions(keep=0)
    assert exc.value.option == "keep"
    with pytest.raises(ConfigError) as exc:  # more than /dev/shm can hold: at construction
        CheckpointManager(tmp_path, memory_tier=MemoryTierOptions(budget_bytes=1 << 60))
    assert exc.value.option == "budget_bytes" and "/dev/shm" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        CheckpointManager(tmp_path, memory_tier=MemoryTierOptions(root=str(tmp_path / "nowhere")))
    assert exc.value.option == "root"
    # the state's size is known at the first save: 256 KiB x (keep 1 + 1) does not fit 300 KiB
    with CheckpointManager(tmp_path, memory_tier=MemoryTierOptions(budget_bytes=300 << 10)) as mgr:
        with pytest.raises(ConfigError) as exc:
            mgr.save(1, _state(1))
        assert exc.value.option == "budget_bytes" and "keep" in str(exc.value)
        assert mgr.steps() == [] and mgr._memory.tier.steps() == []


def test_no_memory_is_left_after_a_normal_exit_without_close(tmp_path, shm_of):
    shm = shm_of(tmp_path)
    subprocess.run(
        [sys.executable, str(HELPERS / "memory_train.py"), str(tmp_path), "--persist", "5", "--until", "7"],
        check=True,
        capture_output=True,
    )
    assert not os.path.exists(shm)  # the exit hook closed the manager: persisted step 7, freed the memory
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [5, 7]


def test_a_fresh_run_does_not_drop_a_crashed_runs_newer_snapshots(tmp_path, shm_of):
    shm = shm_of(tmp_path)
    mgr = CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=5)
    for step in range(1, 8):
        mgr.save(step, _state(step))
    mgr._memory = None  # the memory as a crash leaves it
    mgr.close()
    with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=5) as mgr:
        with pytest.raises(StepExistsError) as exc:
            mgr.start_run(0)  # a fresh run: steps 5 (disk) and 7 (memory) are later
        assert "[5, 7]" in str(exc.value)
        assert mgr.start_run(7, resumed=True) == []
    assert not os.path.exists(shm)


def test_a_snapshot_overwrites_the_pages_of_the_one_it_supersedes(tmp_path, shm_of):
    # keep=1: the superseded snapshot becomes the hidden spare, and the next one is written into its
    # files in place (no fresh tmpfs pages to zero); a smaller state cuts the file, a file not
    # written again goes, and every snapshot reads back as saved.
    shm = shm_of(tmp_path)
    with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=100) as mgr:
        tier = mgr._memory.tier
        inodes = []
        for step, extra in ((1, {"a.bin": b"x" * 5000}), (2, {}), (3, {}), (4, {})):
            state = {"w": torch.full((64, 64) if step < 4 else (8, 8), float(step)), "step": step}
            mgr.save(step, state, extra_files=extra)
            path = tier.path_for(step)
            inodes.append(os.stat(os.path.join(path, "state.safetensors")).st_ino)
            assert tier.steps() == [step] and mgr.restore("latest")["w"][0, 0] == step
            assert sorted(os.listdir(path)) == sorted(["manifest.json", "state.safetensors", *extra])
            assert tier.layout.verify(path) == []
        assert inodes[2] == inodes[0] and inodes[3] == inodes[1]  # the two folders take turns
        hidden = [n for n in os.listdir(tier.folder) if n.startswith(".tmp-")]
        assert len(hidden) == 1  # the spare: never listed
    assert not os.path.exists(shm)


def test_recycled_files_take_a_new_layout_of_the_same_size_and_odd_tensors_bit_for_bit(tmp_path, shm_of):
    # The copy into a recycled file goes through typed views built once per layout: a state whose
    # shapes or dtypes change at the same file size must get new views, and tensors a plain byte
    # copy would get wrong (transposed, lazily conjugated, negated views, offsets) must read back
    # as their values.
    shm_of(tmp_path)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=gen)
    layouts = [
        {"a": torch.randn(32, 64, generator=gen), "b": torch.randn(16, generator=gen)},
        {"a": torch.randn(64, 32, generator=gen), "b": torch.randn(4, 4, generator=gen)},  # shapes change
        {"a": torch.randn(32, 64, generator=gen).to(torch.float64)[:, :32], "b": torch.randn(16, generator=gen)},
        {
            "a": base.t(),
            "b": torch.randn(8, dtype=torch.complex64, generator=gen).conj(),
            "c": torch.randn(6, dtype=torch.complex64, generator=gen).conj().imag,
            "d": base[3:7, 5],
            "e": torch.empty(0, 3),
        },
    ]
    with CheckpointManager(tmp_path, memory_tier=MemoryTierOptions(keep=1), persist_every_n_steps=100) as mgr:
        for step in range(1, 9):
            state = layouts[(step - 1) % len(layouts)]
            mgr.save(step, state)
            got = mgr.restore("latest")
            for key, value in state.items():
                want = value.resolve_conj().resolve_neg().contiguous()
                assert got[key].dtype == want.dtype and got[key].shape == want.shape, (step, key)
                assert torch.equal(got[key], want), (step, key)


@pytest.mark.parametrize("snapshot", ["safe", "overlap"])
def test_tensors_at_unaligned_offsets_are_copied_bit_for_bit_and_checksummed(tmp_path, shm_of, snapshot):
    # The copy into the mapping is one memmove per tensor (per piece in overlap mode): an odd-sized
    # tensor puts every later one at an offset no vector width divides; bytes and checksums must
    # still be exact, and views a memmove cannot copy still go through torch.
    shm_of(tmp_path)
    gen = torch.Generator().manual_seed(5)
    opts = {"memory_tier": True, "persist_every_n_steps": 100}
    if snapshot == "overlap":
        opts.update(async_save=True, snapshot="overlap")
    with CheckpointManager(tmp_path, **opts) as mgr:
        tier = mgr._memory.tier
        for step in range(1, 4):
            state = {
                "a": torch.randn(3, generator=gen),  # 12 bytes: what follows is misaligned
                "b": torch.randn(5 << 18, generator=gen) + step,  # 5 MiB: more than one piece
                "c": torch.randn(7, 9, generator=gen).t(),  # not contiguous
                "d": torch.randn(9, generator=gen),
            }
            mgr.save(step, state)
            mgr.wait_for_snapshot()
            mgr.wait()
            tier.settle()
            got = mgr.restore("latest")
            assert all(torch.equal(got[k], v.contiguous()) for k, v in state.items()), step
            assert tier.layout.verify(tier.path_for(step)) == []


def test_the_deferred_checksum_leaves_the_training_thread_its_core(tmp_path, shm_of, monkeypatch):
    # Default mode hashes a snapshot after its commit, beside the next training step: on one
    # helper thread, however many cores a verified restore would use.
    from ckpt_plugins.files import checksum

    shm_of(tmp_path)
    monkeypatch.setattr(checksum, "cores", lambda: 4)
    hashed_on: list[str] = []
    real = checksum.xxhash.xxh3_64_intdigest

    def recording(data):
        hashed_on.append(threading.current_thread().name)
        return real(data)

    monkeypatch.setattr(checksum.xxhash, "xxh3_64_intdigest", recording)
    with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=100) as mgr:
        mgr.save(1, {"w": torch.zeros(5 * checksum.CHUNK // 4)})  # 5 chunks
        mgr._memory.tier.settle()
        assert len(hashed_on) >= 5 and set(hashed_on) == {"ckpt-snapshot-hash"}


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_snapshot_file_checksum_is_the_same_on_any_number_of_threads(tmp_path, threads):
    """A snapshot from the GPU is hashed on every core but one, a CPU one on one thread: both
    must record the checksum a reader computes (chunked xxh3, independent of the threads)."""
    from ckpt_plugins.memory.mapped import MappedFiles

    mapped = MappedFiles()
    tensors = {f"t{i}": torch.randn(2_500_000 + i) for i in range(4)}  # 40 MB: three 16 MiB chunks
    try:
        _record, mapping = mapped.write(str(tmp_path / "state.safetensors"), tensors, None)
        assert mapping.digest(threads) == checksum_file(LocalStorage(), str(tmp_path / "state.safetensors")).xxh3_64
    finally:
        mapped.close()
